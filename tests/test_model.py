import pytest
import torch

from seq2seq.data.collate import pad
from seq2seq.model.attention import Attention
from seq2seq.model.encoder import reverse_padded
from seq2seq.search import greedy_search
from seq2seq.tokenization import BOS_ID

from .conftest import tiny_model

OPTIONS = [
    {},
    {"bidirectional": True, "bridge": True},
    {"reverse_source": True, "num_layers": 2},
    {"bidirectional": True, "reverse_source": True, "num_layers": 2},
    {"attention": "bahdanau"},
    {"attention": "luong_general", "bidirectional": True, "bridge": True},
    {"attention": "luong_dot", "input_feeding": False},
    {"attention": "bahdanau", "num_layers": 2, "reverse_source": True, "input_feeding": False},
]
ATTENTION = [options for options in OPTIONS if "attention" in options]


def test_reverse_padded_reverses_only_real_tokens():
    tokens = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    assert reverse_padded(tokens, torch.tensor([3, 2])).tolist() == [[7, 6, 5, 0], [9, 8, 0, 0]]


@pytest.mark.parametrize("options", OPTIONS)
def test_context_vector_depends_on_source(options):
    model = tiny_model(**options)
    a = model.encode(torch.tensor([[4, 5, 6, 7]]), torch.tensor([4]))
    b = model.encode(torch.tensor([[4, 5, 6, 8]]), torch.tensor([4]))
    assert a.hidden.shape == (model.encoder.rnn.num_layers, 1, 16)
    assert not torch.allclose(a.hidden, b.hidden)
    assert not torch.allclose(a.cell, b.cell)
    # ... and that state is what the decoder starts from: its first prediction changes with it.
    bos = torch.tensor([BOS_ID])
    assert not torch.allclose(model.decode_step(bos, a)[0], model.decode_step(bos, b)[0])


@pytest.mark.parametrize("options", OPTIONS)
def test_padding_does_not_change_encoder_states(options):
    model = tiny_model(**options)
    sentence = [4, 5, 6]
    alone = model.encoder(pad([sentence]), torch.tensor([3]))
    batch = model.encoder(pad([sentence, [7, 8, 9, 10, 11, 4]]), torch.tensor([3, 6]))
    torch.testing.assert_close(batch.outputs[0, :3], alone.outputs[0])
    torch.testing.assert_close(batch.hidden[:, 0], alone.hidden[:, 0])
    torch.testing.assert_close(batch.cell[:, 0], alone.cell[:, 0])
    assert batch.outputs[0, 3:].abs().sum() == 0


@pytest.mark.parametrize("options", OPTIONS)
def test_teacher_forcing_matches_step_by_step_decoding(options):
    model = tiny_model(**options)
    src, lengths = pad([[4, 5, 6], [7, 8]]), torch.tensor([3, 2])
    tgt_in = torch.tensor([[BOS_ID, 4, 9, 10], [BOS_ID, 11, 5, 6]])
    teacher_forced = model.logits(model(src, lengths, tgt_in)).log_softmax(-1)  # (2, 4, V)
    state = model.encode(src, lengths)
    for t in range(tgt_in.size(1)):
        log_probs, state = model.decode_step(tgt_in[:, t], state)
        torch.testing.assert_close(log_probs, teacher_forced[:, t])


def test_tied_embeddings_share_weights_and_need_equal_sizes():
    model = tiny_model(embed_size=16, tie_embeddings=True)
    assert model.decoder.output.weight is model.decoder.embedding.weight
    with pytest.raises(ValueError, match=r"model.tie_embeddings needs model.embed_size == model.hidden_size"):
        tiny_model(embed_size=8, tie_embeddings=True)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"hidden_size": 0}, "model.hidden_size must be positive"), ({"dropout": 1.0}, "model.dropout")],
)
def test_impossible_sizes_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**options)


@pytest.mark.parametrize("options", ATTENTION)
def test_attention_weights_sum_to_one_over_the_real_source(options):
    model = tiny_model(**options)
    src, lengths = pad([[4, 5, 6], [7, 8, 9, 10, 11]]), torch.tensor([3, 5])
    tgt_in = torch.tensor([[BOS_ID, 4, 9], [BOS_ID, 11, 5]])
    _, weights = model.forward_with_attention(src, lengths, tgt_in)
    assert weights.shape == (2, 3, 5)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2, 3))
    assert weights[0, :, 3:].abs().sum() == 0  # padding gets no attention


@pytest.mark.parametrize("options", ATTENTION)
def test_padding_a_source_does_not_change_its_translation(options):
    model = tiny_model(**options)
    sentence, other, tgt_in = [4, 5, 6], [7, 8, 9, 10, 11, 4], torch.tensor([[BOS_ID, 7, 8, 9]])
    alone = model.logits(model(pad([sentence]), torch.tensor([3]), tgt_in))
    padded = model.logits(model(pad([sentence, other]), torch.tensor([3, 6]), tgt_in.repeat(2, 1)))
    torch.testing.assert_close(padded[0], alone[0])
    lone = greedy_search(model, pad([sentence]), torch.tensor([3]), max_len_b=6)
    in_batch = greedy_search(model, pad([sentence, other]), torch.tensor([3, 6]), max_len_b=6)
    assert in_batch[0].tokens == lone[0].tokens


def test_bad_attention_options_name_the_option():
    with pytest.raises(ValueError, match=r"model\.attention must be null or one of"):
        tiny_model(attention="cosine")
    with pytest.raises(ValueError, match="luong_dot attention needs equal sizes"):
        Attention("luong_dot", 16, 8)
