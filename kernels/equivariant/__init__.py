"""Low-order equivariant messages (MACE-class): real spherical harmonics up to l = 3, the
channelwise tensor-product convolution and the symmetric contraction; maths in README.md."""
