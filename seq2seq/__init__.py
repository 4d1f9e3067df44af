"""LSTM sequence-to-sequence translation with PyTorch Lightning and Hydra."""
