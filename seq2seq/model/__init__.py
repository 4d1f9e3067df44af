"""Model modules: encoder, decoder and the encoder-decoder that wires them."""

from seq2seq.model.decoder import Decoder, DecoderState
from seq2seq.model.encoder import Bridge, Encoder, EncoderOutput
from seq2seq.model.seq2seq import Seq2Seq

__all__ = ["Bridge", "Decoder", "DecoderState", "Encoder", "EncoderOutput", "Seq2Seq"]
