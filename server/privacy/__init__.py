"""Client-level differential privacy on the server: the accountant and the central release."""
