"""Will it fit? ``estimate.py`` builds the same adapted model on the meta device (no weight is read) and
adds up parameters, optimizer states, activations and the runtime for one training step."""
