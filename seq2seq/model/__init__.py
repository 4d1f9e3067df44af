"""Model modules: encoder, decoder and the encoder-decoder that wires them."""

from seq2seq.model.attention import Attention
from seq2seq.model.decoder import Decoder, DecoderState
from seq2seq.model.encoder import Bridge, Encoder, EncoderOutput
from seq2seq.model.ensemble import Ensemble
from seq2seq.model.seq2seq import Seq2Seq

__all__ = [
    "Attention", "Bridge", "Decoder", "DecoderState", "Encoder", "EncoderOutput", "Ensemble", "Seq2Seq",
]  # fmt: skip
