-- Owners of routing and reflection leases: a replica frees the leases of one that died.
ALTER TABLE events ADD COLUMN route_owner TEXT;
ALTER TABLE reflections ADD COLUMN lease_owner TEXT;
