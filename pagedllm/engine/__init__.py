"""The engine: the core step loop and the front end around it (inputs, outputs)."""
