"""What fleetctl knows, as data with its sources: the compatibility matrix (and the refresh that derives its
rows from the wheels' own binaries), GPU health rules and the Xid catalog, host packages per distribution."""
