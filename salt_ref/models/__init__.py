"""Networks: the 2D toy MLP (``mlp``) and, from one class at every scale, the Wan 2.1 transformer."""
