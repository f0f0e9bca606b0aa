# NixOS VM test: three machines on one VLAN find each other by mDNS and
# one substitutes a path another holds, through the mesh.
# Run: nix build .#checks.x86_64-linux.mesh
{ pkgs, module, package }:

let
  # A key for this test only.
  officeSecret = pkgs.writeText "office.sk"
    "vmtest-office-1:aD2oQCkKXywdxlCI871RmWkpKMn3f9u9vzv+iuBGo2Wx7APAFXhmya1X37wzhjt4+VlzEAII9Yw1BdYalssmwA==";
  officePublic = "vmtest-office-1:sewDwBV4ZsmtV9+8M4Y7ePlZcxACCPWMNQXWGpbLJsA=";

  node = { lib, ... }: {
    imports = [ module ];
    services.nixmesh = {
      enable = true;
      inherit package;
      openFirewall = true;
      trustedPublicKeys = [ officePublic ];
      settings.share.trusted_keys = [ officePublic ];
    };
    # Offline: the mesh is the only cache.
    nix.settings.substituters = lib.mkForce [ "http://127.0.0.1:5181" ];
    environment.systemPackages = [ package ];
  };
in
pkgs.testers.runNixOSTest {
  name = "nixmesh-mesh";
  nodes = {
    a = node;
    b = node;
    c = node;
  };
  testScript = ''
    start_all()
    for m in [a, b, c]:
        m.wait_for_unit("nixmesh.socket")
        m.wait_for_unit("nixmesh.service")

    # Each node sees the other two alive, found by mDNS alone.
    for m in [a, b, c]:
        m.wait_until_succeeds(
            "test $(nixmesh peers --json | grep -c '\"state\": \"alive\"') -eq 2", timeout=60
        )

    # A path on a, signed with the office key, reaches b through the mesh.
    a.succeed("echo 'from a' > /tmp/doc.txt")
    path = a.succeed("nix-store --add /tmp/doc.txt").strip()
    a.succeed(f"nix store sign --extra-experimental-features nix-command -k ${officeSecret} {path}")
    b.succeed(f"nix-store -r {path}")
    b.succeed(f"nix-store --verify-path {path}")
    b.succeed(f"nixmesh why {path} | grep 'would win'")

    # Restarting the agent never breaks a client: the socket stays up.
    b.succeed("systemctl restart nixmesh.service")
    c.succeed(f"nix-store -r {path}")
  '';
}
