"""From a collection's files to the Parquet store and back: metadata and format readers, the
patient split, image decoding, the Spark ETL, the store, the streaming loader, synthetic data.
"""
