"""Numbers: precisions and their rounding, norms, cosines, rounding bounds, spectra, NaN and Inf."""
