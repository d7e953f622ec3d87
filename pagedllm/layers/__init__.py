"""Building blocks of the model forward passes."""
