"""One module per architecture family; `registry` maps general.architecture to the family."""
