"""LSTM sequence-to-sequence translation with PyTorch Lightning and Hydra."""

from dataclasses import asdict

from hydra.core.config_store import ConfigStore

from seq2seq.decoding import DecodingSettings

# The decoding config group's defaults are DecodingSettings' own (conf/decoding/default.yaml extends it).
ConfigStore.instance().store(group="decoding", name="base", node=asdict(DecodingSettings()))
