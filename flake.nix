{
  description = "nixmesh: a LAN peer-to-peer cache mesh for Nix";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAll (pkgs: rec {
        nixmesh = pkgs.callPackage ./nixos/package.nix { };
        default = nixmesh;
      });

      nixosModules.default = { pkgs, lib, ... }: {
        imports = [ ./nixos/module.nix ];
        services.nixmesh.package =
          lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.nixmesh;
      };

      checks = forAll (pkgs: {
        mesh = import ./nixos/vm-test.nix {
          inherit pkgs;
          module = self.nixosModules.default;
          package = self.packages.${pkgs.stdenv.hostPlatform.system}.nixmesh;
        };
      });
    };
}
