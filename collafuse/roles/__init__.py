"""One party each: the client (with its privacy policy, release ledger and noise) and the server."""
