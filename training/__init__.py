"""Training code of the shipped demo model (see demo_model/MODEL_CARD.md); not used by the nodes."""
