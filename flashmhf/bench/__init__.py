"""Side-by-side measurements of the op, the layer and the baselines."""
