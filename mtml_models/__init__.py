"""mtml_models."""
