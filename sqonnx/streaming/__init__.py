"""A model as blocks along its residual stream, and running samples through them."""
