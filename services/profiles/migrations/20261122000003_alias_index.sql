-- Aliases of a customer are looked up on every uncached read (PRF-3, PRF-9).
CREATE INDEX customers_merged_into ON customers (merged_into) WHERE merged_into IS NOT NULL;
