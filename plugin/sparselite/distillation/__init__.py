"""Knowledge distillation: the compressed student learns from the softened outputs of a float teacher.

  - ``loss.py``: the Hinton et al. loss on logits and how it mixes with the user's loss;
  - ``teacher.py``: finding the teacher (a module, a checkpoint read as tensors only, or ``"initial"``),
    freezing it, and fingerprinting it so a resumed run can prove it found the same one;
  - ``distiller.py``: the framework-free core (capture the student's outputs, run the teacher on the same
    input, add the loss on its schedule);
  - ``callback.py``: ``Distillation``, the thin Lightning adapter.
"""
