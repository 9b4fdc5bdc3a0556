"""``nn.GRU``, ``nn.LSTM`` and ``nn.RNN`` computed one time step at a time, as the converted file computes
them, so that the inputs of their matrix products can be rounded as the file rounds them.

litert-torch writes a recurrent layer as one FULLY_CONNECTED over every time step's input (the input
projection), then, at each step, a FULLY_CONNECTED of the previous hidden state and the gates'
elementwise ops. In a dynamic-range file XNNPACK quantizes the input of each of those FCs per row: a
time step's input vector, and the hidden state. torch's fused kernel has no place where that rounding
could go; ``steps_forward`` is the same arithmetic with a ``round_rows`` before each product.

Handles any number of layers, both directions, ``batch_first``, unbatched input and inter-layer dropout.
Not an LSTM with ``proj_size`` or a ``PackedSequence`` input: ``stepwise`` says so, and those layers keep
torch's kernel (their weights are still simulated).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

RoundRows = Callable[[torch.Tensor], torch.Tensor]
WeightOf = Callable[[str, torch.Tensor], torch.Tensor]


def stepwise(module: nn.Module) -> bool:
    """Whether ``steps_forward`` computes this module."""
    return isinstance(module, (nn.GRU, nn.LSTM, nn.RNN)) and not getattr(module, "proj_size", 0)


def steps_forward(module: nn.RNNBase, x: torch.Tensor, hx=None, round_rows: RoundRows = lambda v: v,
                  weight_of: WeightOf = lambda name, w: w):
    """What ``module(x, hx)`` returns, computed step by step. ``round_rows``: applied to the input of each
    matrix product (every row of a layer's input sequence, the hidden state at each step);
    ``weight_of(name, parameter)``: the weight each product reads (``weight_ih_l0``, ...), e.g. fake-quantized."""
    is_lstm = isinstance(module, nn.LSTM)
    unbatched = x.dim() == 2
    if unbatched:
        x = x.unsqueeze(0 if module.batch_first else 1)
    sequence = x if module.batch_first else x.transpose(0, 1)  # [batch, time, features]
    directions = 2 if module.bidirectional else 1
    shape = (module.num_layers * directions, sequence.shape[0], module.hidden_size)
    if hx is None:
        zeros = sequence.new_zeros(shape)
        hx = (zeros, zeros) if is_lstm else zeros
    elif unbatched:
        hx = tuple(h.unsqueeze(1) for h in hx) if is_lstm else hx.unsqueeze(1)
    h0, c0 = hx if is_lstm else (hx, None)
    last_h, last_c = [], []
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            index = layer * directions + direction
            output, h, c = _one_direction(module, sequence, suffix, h0[index], None if c0 is None else c0[index],
                                          bool(direction), round_rows, weight_of)
            outputs.append(output)
            last_h.append(h)
            last_c.append(c)
        sequence = torch.cat(outputs, -1) if directions == 2 else outputs[0]
        if module.dropout and module.training and layer < module.num_layers - 1:
            sequence = F.dropout(sequence, module.dropout, training=True)
    output = sequence if module.batch_first else sequence.transpose(0, 1)
    h_n = torch.stack(last_h)
    state = (h_n, torch.stack(last_c)) if is_lstm else h_n
    if unbatched:
        output = output.squeeze(0 if module.batch_first else 1)
        state = tuple(s.squeeze(1) for s in state) if is_lstm else state.squeeze(1)
    return output, state


def _one_direction(module, sequence: torch.Tensor, suffix: str, h: torch.Tensor, c: torch.Tensor | None,
                   reverse: bool, round_rows: RoundRows, weight_of: WeightOf):
    """One layer in one direction over ``sequence`` [batch, time, features]: its outputs in time order,
    and its last hidden (and cell) state."""
    def parameter(name: str) -> torch.Tensor | None:
        return getattr(module, name + suffix) if module.bias or not name.startswith("bias") else None

    w_ih = weight_of("weight_ih" + suffix, parameter("weight_ih"))
    w_hh = weight_of("weight_hh" + suffix, parameter("weight_hh"))
    b_ih, b_hh = parameter("bias_ih"), parameter("bias_hh")
    projected = F.linear(round_rows(sequence), w_ih, b_ih)  # every step's input at once, as the file does
    steps = range(sequence.shape[1] - 1, -1, -1) if reverse else range(sequence.shape[1])
    outputs = [None] * sequence.shape[1]
    for t in steps:
        recurrent = F.linear(round_rows(h), w_hh, b_hh)
        if isinstance(module, nn.RNN):  # Elman: one tanh or relu of both products
            h = (torch.tanh if module.nonlinearity == "tanh" else torch.relu)(projected[:, t] + recurrent)
        elif c is None:  # GRU: gates r, z, n
            i_r, i_z, i_n = projected[:, t].chunk(3, -1)
            h_r, h_z, h_n = recurrent.chunk(3, -1)
            r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            h = (1 - z) * n + z * h
        else:  # LSTM: gates i, f, g, o
            i, f, g, o = (projected[:, t] + recurrent).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        outputs[t] = h
    return torch.stack(outputs, 1), h, c
