"""Training loops and train scripts (``jaxattn.train``)."""
