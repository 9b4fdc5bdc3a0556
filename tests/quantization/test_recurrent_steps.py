"""GRU, LSTM and RNN step by step: torch's own results when nothing is rounded, whatever the layer's options."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparselite.quantization.recurrent_steps import steps_forward, stepwise


@pytest.mark.parametrize("kind", [nn.GRU, nn.LSTM, nn.RNN, lambda *a, **k: nn.RNN(*a, nonlinearity="relu", **k)],
                         ids=["GRU", "LSTM", "RNN", "RNN_relu"])
@pytest.mark.parametrize("options", [
    dict(batch_first=True),
    dict(num_layers=2, bidirectional=True),
    dict(batch_first=True, num_layers=2, bias=False),
])
def test_steps_give_torchs_results(kind, options):
    torch.manual_seed(0)
    layer = kind(6, 5, **options).eval()
    x = torch.randn(3, 7, 6) if options.get("batch_first") else torch.randn(7, 3, 6)  # batch 3, 7 steps
    directions = 2 if options.get("bidirectional") else 1
    h0 = torch.randn(options.get("num_layers", 1) * directions, 3, 5)
    for hx in (None, (h0, torch.randn_like(h0)) if kind is nn.LSTM else h0):
        expected_out, expected_state = layer(x, hx)
        out, state = steps_forward(layer, x, hx)
        torch.testing.assert_close(out, expected_out, atol=1e-6, rtol=1e-5)
        for got, expected in zip(state if kind is nn.LSTM else [state], expected_state if kind is nn.LSTM else [expected_state]):
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_unbatched_input_and_what_is_rounded():
    torch.manual_seed(0)
    layer = nn.GRU(4, 3).eval()
    x = torch.randn(5, 4)
    torch.testing.assert_close(steps_forward(layer, x)[0], layer(x)[0], atol=1e-6, rtol=1e-5)
    seen = []
    steps_forward(layer, x, round_rows=lambda v: seen.append(tuple(v.shape)) or v)
    # the input projection once over every step, then the hidden state at each of the 5 steps
    assert seen == [(1, 5, 4)] + [(1, 3)] * 5


def test_a_projected_lstm_keeps_torchs_kernel():
    assert stepwise(nn.GRU(4, 3)) and stepwise(nn.LSTM(4, 3)) and stepwise(nn.RNN(4, 3))
    assert not stepwise(nn.LSTM(4, 3, proj_size=2))
