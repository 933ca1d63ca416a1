"""Jobs that wire the mtrec library together (each a plain function plus a `mtrec` sub-command)."""
