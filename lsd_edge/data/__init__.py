"""Data: LLaVA-format records, chat encoding, the data set and its batches, sampling, ShapesVQA, eval questions."""
