"""Collaboration on top of the engine: prompts, the Hogwild! protocol, Group Think."""
