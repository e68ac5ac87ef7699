"""Physics as small pure functions: CTF, dose, Zernike aberrations, geometry (units in names)."""
