"""The input-feeding decoder's loop (seq2seq.model.recurrence): the same outputs and gradients as
``nn.LSTM`` run one position at a time, which it replaced for speed."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from seq2seq.model.decoder import Decoder
from seq2seq.model.encoder import EncoderOutput
from seq2seq.model.recurrence import LoopOperand


def test_a_loop_weight_gets_the_gradient_autograd_would_give():
    torch.manual_seed(0)
    weight = torch.randn(6, 4, requires_grad=True)
    x0 = torch.randn(3, 4, requires_grad=True)

    def run(product) -> torch.Tensor:
        x, outputs = x0, []
        for _ in range(5):
            x = product(x).tanh()[:, :4]
            outputs.append(x)
        return torch.stack(outputs).pow(2).sum()

    run(lambda x: x @ weight.t()).backward()
    expected = weight.grad.clone(), x0.grad.clone()
    weight.grad = x0.grad = None
    loop = LoopOperand(weight.t())
    run(loop.product).backward()
    torch.testing.assert_close((weight.grad, x0.grad), expected)
    assert not loop.inputs and not loop.output_grads  # nothing kept after the backward
    with torch.no_grad():
        searching = LoopOperand(weight.t())
        searching.product(x0)
    assert not searching.inputs  # search keeps nothing


def reference_input_feeding(decoder: Decoder, tgt_in: torch.Tensor, state):
    """The loop it replaced: ``nn.LSTM`` over one position at a time, attention and the feed after it."""
    embedded = decoder.embedding(tgt_in)
    steps, weights = [], []
    for t in range(tgt_in.size(1)):
        rnn_input = torch.cat([embedded[:, t : t + 1], state.feed.unsqueeze(1)], dim=-1)
        output, (hidden, cell) = decoder.rnn(rnn_input, (state.hidden, state.cell))
        attentional, step_weights = decoder._attend(output, state)
        state = replace(state, hidden=hidden, cell=cell, feed=attentional.squeeze(1))
        steps.append(attentional)
        weights.append(step_weights)
    return torch.cat(steps, dim=1), state, torch.cat(weights, dim=1)


@pytest.mark.parametrize("attention", ["bahdanau", "luong_general", "luong_dot"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_input_feeding_matches_the_lstm_step_by_step_in_outputs_and_gradients(attention, num_layers):
    torch.manual_seed(0)
    decoder = Decoder(30, 8, 16, num_layers, attention=attention, memory_size=16)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] * 4 + [False]])
    # the encoder's outputs, hidden and cell states as the decoder gets them: with gradients
    memory = torch.randn(3, 5, 16).masked_fill(~mask.unsqueeze(2), 0.0).requires_grad_()
    hidden = torch.randn(num_layers, 3, 16, requires_grad=True)
    cell = torch.randn(num_layers, 3, 16, requires_grad=True)
    tgt_in = torch.randint(4, 30, (3, 7))

    def run(forward):
        decoder.zero_grad()
        memory.grad = hidden.grad = cell.grad = None
        state = decoder.init_state(hidden, cell, EncoderOutput(memory, hidden, cell, mask))
        outputs, final, weights = forward(tgt_in, state)
        (outputs.pow(2).sum() + final.hidden.sum() + final.cell.sum()).backward()
        grads = {name: p.grad.clone() for name, p in decoder.named_parameters() if p.grad is not None}
        return outputs, final.hidden, final.cell, weights, grads, memory.grad, hidden.grad, cell.grad

    expected = run(lambda tgt, state: reference_input_feeding(decoder, tgt, state))
    got = run(decoder)
    assert len(got[4]) == len(list(decoder.parameters())) - 2  # all but the output projection (weight, bias)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["bahdanau", "luong_dot"])
def test_one_position_at_a_time_as_search_runs_matches_teacher_forcing(attention):
    """Search feeds one position per call (nn.LSTM's own kernel); teacher forcing runs the written-out
    loop over all positions: the same outputs, attention and final state."""
    torch.manual_seed(0)
    decoder = Decoder(30, 8, 16, 2, attention=attention, memory_size=16).eval()
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    memory, hidden, cell = torch.randn(2, 5, 16), torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    tgt_in = torch.randint(4, 30, (2, 6))
    state = decoder.init_state(hidden, cell, EncoderOutput(memory, hidden, cell, mask))
    with torch.no_grad():
        outputs, final, weights = decoder(tgt_in, state)
        steps, step_weights = [], []
        for position in tgt_in.unbind(1):
            output, state, weight = decoder(position.unsqueeze(1), state)
            steps.append(output)
            step_weights.append(weight)
    expected = (outputs, weights, final.hidden, final.cell, final.feed)
    got = (torch.cat(steps, dim=1), torch.cat(step_weights, dim=1), state.hidden, state.cell, state.feed)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_a_search_step_written_out_matches_nn_lstm_and_the_next_search_takes_changed_weights(num_layers):
    """At inference one position runs as cells with the weights prepared as the search starts
    (InferenceStep): the same output and states as nn.LSTM, and after the weights change (a training
    step between two validations) the next search's."""
    torch.manual_seed(0)
    decoder = Decoder(30, 8, 16, num_layers).eval()
    hidden, cell = torch.randn(num_layers, 3, 16), torch.randn(num_layers, 3, 16)
    tokens = torch.randint(4, 30, (3, 1))
    encoded = EncoderOutput(torch.zeros(3, 2, 16), hidden, cell, torch.ones(3, 2, dtype=torch.bool))

    def search_step():
        with torch.no_grad():
            outputs, final, _ = decoder(tokens, decoder.init_state(hidden, cell, encoded))
            expected, (expected_hidden, expected_cell) = decoder.rnn(
                decoder.embedding(tokens), (hidden, cell)
            )
        torch.testing.assert_close(
            (outputs, final.hidden, final.cell), (expected, expected_hidden, expected_cell)
        )
        return outputs

    before = search_step()
    with torch.no_grad():
        decoder.rnn.weight_hh_l0.mul_(0.5)
    assert not torch.allclose(search_step(), before)
