-- SEG-5 from feedback's events: unresolved complaints and bad service
-- experiences (an SLA breach on a ticket, a CSAT of 1-2) raise churn risk.
CREATE TABLE complaint_tickets (
    ticket_id   UUID PRIMARY KEY,
    customer_id UUID    NOT NULL,
    open        BOOLEAN NOT NULL
);
CREATE INDEX complaint_tickets_open ON complaint_tickets (customer_id) WHERE open;

CREATE TABLE bad_experiences (
    customer_id UUID PRIMARY KEY,
    last_at     TIMESTAMPTZ NOT NULL
);
