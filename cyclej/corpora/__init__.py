"""The text: corpus lines, the training example formats and the template transfer."""
