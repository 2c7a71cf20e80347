"""`kvp calibrate`: a policy's scores on one scale across heads, and what moving its budget buys on held-out traces."""
