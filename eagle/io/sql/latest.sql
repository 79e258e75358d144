-- Latest verdict per image across all runs (DuckDB). Replace the path with your output prefix.
-- A later successful audit supersedes earlier ones; error rows only count when an image never succeeded.
CREATE OR REPLACE VIEW audit AS
SELECT * FROM read_parquet('${OUTPUT}/**/*.parquet', hive_partitioning = true, union_by_name = true);

CREATE OR REPLACE VIEW latest AS
SELECT * EXCLUDE (rn) FROM (
    SELECT *, row_number() OVER (
        PARTITION BY image_uri
        ORDER BY (status = 'ok') DESC, audited_at DESC, run_id DESC
    ) AS rn
    FROM audit
) WHERE rn = 1;
