-- A tenant may require every event's service type to be built in or registered; by default an
-- unregistered type is taken as a custom event, as the older system did.
ALTER TABLE tenants
    ADD COLUMN require_registered_services INTEGER NOT NULL DEFAULT 0
        CHECK (require_registered_services IN (0, 1));
