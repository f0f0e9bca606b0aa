# NixOS module for nixmesh: `services.nixmesh`.
#
#   imports = [ nixmesh.nixosModules.default ];
#   services.nixmesh = {
#     enable = true;
#     openFirewall = true;
#     trustedPublicKeys = [ "office-1:..." ];
#     signingKeyFile = "/var/lib/secrets/office-1.sk";   # on build hosts
#     settings.mesh.secret_file = "/var/lib/secrets/mesh.secret";
#   };
#
# Every key of config.example.toml can be set under `settings`.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.nixmesh;
  settingsFormat = pkgs.formats.toml { };
  credentials = "/run/credentials/nixmesh.service";
  substituterUrl = "http://127.0.0.1:${toString cfg.port}";

  # The agent pulls what no peer holds from the host's other HTTP(S)
  # substituters (cache.nixos.org by default), once for the whole office;
  # Nix keeps them after the agent as its fallback.
  baseUrl = s: lib.removeSuffix "/" (builtins.head (lib.splitString "?" s));
  upstreamCaches = builtins.filter
    (s: (lib.hasPrefix "http://" s || lib.hasPrefix "https://" s) && s != substituterUrl)
    (map baseUrl config.nix.settings.substituters);

  finalSettings = lib.recursiveUpdate
    ({
      state_dir = "/var/lib/nixmesh";
      substituter.listen = "127.0.0.1:${toString cfg.port}";
      mesh.listen = "[::]:${toString cfg.quicPort}";
      upstream.caches = upstreamCaches;
    } // lib.optionalAttrs (cfg.signingKeyFile != null) {
      signing_key_file = "${credentials}/signing-key";
    } // lib.optionalAttrs (cfg.meshSecretFile != null) {
      mesh.secret_file = "${credentials}/mesh-secret";
    })
    cfg.settings;

  configFile = settingsFormat.generate "nixmesh.toml" finalSettings;
in
{
  options.services.nixmesh = {
    enable = lib.mkEnableOption "nixmesh, the LAN peer-to-peer cache mesh for Nix";

    package = lib.mkOption {
      type = lib.types.package;
      description = "The nixmesh package.";
    };

    settings = lib.mkOption {
      type = settingsFormat.type;
      default = { };
      description = ''
        nixmesh configuration, rendered to its TOML config file. Every key
        of config.example.toml is accepted; these win over the values the
        module derives from its other options.
      '';
    };

    port = lib.mkOption {
      type = lib.types.port;
      default = 5181;
      description = "Port of the localhost substituter Nix talks to (socket-activated).";
    };

    quicPort = lib.mkOption {
      type = lib.types.port;
      default = 5182;
      description = "UDP port for QUIC between agents.";
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Open the mesh port (UDP for QUIC, TCP for bulk NAR connections) and mDNS (UDP 5353) in the firewall.";
    };

    signingKeyFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      description = ''
        Nix signing key (secret file from `nix-store --generate-binary-cache-key`
        or `nixmesh keygen`). Paths built on this host are signed with it and
        shared. Passed to the service as a credential; it stays out of the store.
      '';
    };

    meshSecretFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      description = "File holding the mesh secret; nodes without it are refused.";
    };

    trustedPublicKeys = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      description = "Keys added to nix.settings.trusted-public-keys (e.g. the office key).";
    };

    addSubstituter = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "Put the localhost substituter ahead of the others in nix.settings.substituters.";
    };
  };

  config = lib.mkIf cfg.enable {
    nix.settings.substituters = lib.mkIf cfg.addSubstituter (lib.mkBefore [ substituterUrl ]);
    nix.settings.trusted-public-keys = cfg.trustedPublicKeys;

    # Where `nixmesh peers`, `status`, `why` and `doctor` look by default.
    environment.etc."nixmesh/config.toml".source = configFile;
    environment.systemPackages = [ cfg.package ];

    # The agent asks for 8 MiB UDP socket buffers; without CAP_NET_ADMIN it
    # gets at most these. Smaller ones overflow under a NAR stream, and each
    # lost datagram slows QUIC down. NixOS keeps the highest value that any
    # module sets for these two.
    boot.kernel.sysctl = {
      "net.core.rmem_max" = 8388608;
      "net.core.wmem_max" = 8388608;
    };

    networking.firewall = lib.mkIf cfg.openFirewall {
      allowedUDPPorts = [ cfg.quicPort 5353 ];
      # Bulk NAR connections between agents (protocol version 5).
      allowedTCPPorts = [ cfg.quicPort ];
    };

    # The listener outlives the agent: Nix (2.8 caches nix-cache-info forever
    # and fails every run while a cache it has seen is unreachable) never
    # meets a refused connection while the agent restarts.
    systemd.sockets.nixmesh = {
      description = "nixmesh substituter socket";
      wantedBy = [ "sockets.target" ];
      listenStreams = [ "127.0.0.1:${toString cfg.port}" ];
      socketConfig = {
        FileDescriptorName = "substituter";
        Backlog = 1024;
      };
    };

    systemd.services.nixmesh = {
      description = "nixmesh LAN cache mesh for Nix";
      wantedBy = [ "multi-user.target" ];
      requires = [ "nixmesh.socket" ];
      after = [ "network-online.target" "nixmesh.socket" "nix-daemon.service" ];
      wants = [ "network-online.target" ];
      serviceConfig = {
        ExecStart = "${cfg.package}/bin/nixmesh agent --config ${configFile}";
        Restart = "always";
        RestartSec = "1s";
        # Reading a WAL-mode SQLite DB safely beside nix-daemon needs the
        # right to create its -shm file in /nix/var/nix/db, which only root
        # has. So: root, but with no capabilities and a read-only view of
        # everything else.
        User = "root";
        CapabilityBoundingSet = "";
        AmbientCapabilities = "";
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ReadWritePaths = [ "/nix/var/nix/db" ];
        ReadOnlyPaths = [ "/nix/store" ];
        StateDirectory = "nixmesh";
        StateDirectoryMode = "0700";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" "AF_NETLINK" ];
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" "~@privileged" ];
        UMask = "0077";
        LoadCredential =
          lib.optional (cfg.signingKeyFile != null) "signing-key:${cfg.signingKeyFile}"
          ++ lib.optional (cfg.meshSecretFile != null) "mesh-secret:${cfg.meshSecretFile}";
      };
    };
  };
}
