# The nixmesh package, built from this repository with Cargo.lock pinned.
{ lib, rustPlatform }:

rustPlatform.buildRustPackage {
  pname = "nixmesh";
  version = (lib.importTOML ../Cargo.toml).package.version;
  src = lib.cleanSourceWith {
    src = ../.;
    filter = path: type:
      let base = baseNameOf path; in
      !(type == "directory" && (base == "target" || base == ".git"));
  };
  cargoLock.lockFile = ../Cargo.lock;
  # The tests need root, network namespaces and real nix-daemons; they run
  # in CI (`bash .ci/test`) and in the NixOS VM test instead.
  doCheck = false;
  meta = {
    description = "LAN peer-to-peer cache mesh for Nix";
    mainProgram = "nixmesh";
    license = with lib.licenses; [ mit asl20 ];
    platforms = lib.platforms.linux;
  };
}
