"""calib_data stage."""
