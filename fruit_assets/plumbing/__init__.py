"""Process plumbing: quiet start-up of TensorFlow and Spark, progress of long Spark actions, and what
only classic Spark has (each with a Spark Connect path)."""
