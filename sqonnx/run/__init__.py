"""One run, from the model to the written output: front end, pipeline over the blocks, building a block."""
