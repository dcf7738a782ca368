"""The client side of thawd: the connection (gRPC and the fd socket), its records, and the
restore and freeze sessions that move bytes through thaw.copy."""
