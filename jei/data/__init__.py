"""Datasets as seeded train / validation / calibration / test splits (see ``base.DataSplits``)."""
