-- SEG-6: segment rules filter on custom attributes, so they are kept queryable.
ALTER TABLE customers DROP COLUMN attributes;
ALTER TABLE customers ADD COLUMN attributes JSONB NOT NULL DEFAULT '{}';
