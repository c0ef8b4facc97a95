class TokenizerError(ValueError):
    """A tokenizer that cannot be built or used: the message names the key, value or file at fault."""
