"""Evaluation of predicted label maps: Dice, IoU, HD95 and NSD per case and class, summary.json as nnU-Net."""
