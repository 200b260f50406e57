"""Toy worlds with exact or physically known answers: 2D Gaussian mixtures (and later, small videos)."""
