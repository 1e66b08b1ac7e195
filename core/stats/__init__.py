"""Statistics: operating-threshold policies (bootstrap, permutation, DeLong and MRMC follow in later issues)."""
