"""The real servers of the test suite: a private PostgreSQL, Apache Kafka, Apache Cassandra."""
