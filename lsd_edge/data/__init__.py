"""Data: the ShapesVQA generator, LLaVA-format loading, chat templating, masks and collation."""
