"""The offline tiny model zoo: a base, skill experts, a distractor and a joint reference."""
