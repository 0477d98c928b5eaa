-- OUT-5 "no marketing while the customer has an open complaint ticket",
-- from feedback's ticket events. The latest event per ticket wins, so
-- replicas applying them out of order converge.
CREATE TABLE complaint_tickets (
    ticket_id    TEXT PRIMARY KEY,
    customer_id  UUID        NOT NULL,
    open         BOOLEAN     NOT NULL,
    as_of        TIMESTAMPTZ NOT NULL
);
CREATE INDEX complaint_tickets_customer ON complaint_tickets (customer_id) WHERE open;
