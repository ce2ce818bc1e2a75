// plinth-interop-go: talks to plinth's sockets the way real Go programs do, and prints what it
// got as JSON for the Rust tests to check.
//
//	register -socket PATH        dial as kubelet's plugin watcher does (passthrough target = the
//	                             socket path, so :authority is the path); GetInfo, then
//	                             NotifyRegistrationStatus(registered)
//	csi -socket PATH -dial MODE  MODE "path": the same dial on a CSI socket (what Go tools that
//	                             dial by path do); MODE "unix": a unix:// target (csi-sanity,
//	                             external sidecars). GetPluginInfo, GetPluginCapabilities, and
//	                             NodeGetInfo when the plugin has a Node service.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"time"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

const timeout = 10 * time.Second

// dialLikeKubelet copies the options of kubelet's plugin watcher
// (pkg/kubelet/pluginmanager/operationexecutor/operation_generator.go, func dial, v1.37.2).
func dialLikeKubelet(ctx context.Context, socket string) (*grpc.ClientConn, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	//nolint:staticcheck // DialContext + WithBlock is exactly what kubelet does.
	return grpc.DialContext(ctx, socket,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithBlock(),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", addr)
		}),
	)
}

func dialUnixTarget(socket string) (*grpc.ClientConn, error) {
	return grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

func emit(v any) {
	if err := json.NewEncoder(os.Stdout).Encode(v); err != nil {
		fail("encoding output: %v", err)
	}
}

func register(socket string) {
	conn, err := dialLikeKubelet(context.Background(), socket)
	if err != nil {
		fail("dial %s: %v", socket, err)
	}
	defer conn.Close()
	client := registerapi.NewRegistrationClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	info, err := client.GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil {
		fail("GetInfo: %v", err)
	}
	if _, err := client.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
		fail("NotifyRegistrationStatus: %v", err)
	}
	emit(map[string]any{
		"type":               info.Type,
		"name":               info.Name,
		"endpoint":           info.Endpoint,
		"supported_versions": info.SupportedVersions,
		"notified":           true,
	})
}

func csiCalls(socket, dial string) {
	var conn *grpc.ClientConn
	var err error
	switch dial {
	case "path":
		conn, err = dialLikeKubelet(context.Background(), socket)
	case "unix":
		conn, err = dialUnixTarget(socket)
	default:
		fail("unknown -dial %q", dial)
	}
	if err != nil {
		fail("dial %s: %v", socket, err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	identity := csi.NewIdentityClient(conn)
	info, err := identity.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
	if err != nil {
		fail("GetPluginInfo: %v", err)
	}
	caps, err := identity.GetPluginCapabilities(ctx, &csi.GetPluginCapabilitiesRequest{})
	if err != nil {
		fail("GetPluginCapabilities: %v", err)
	}
	out := map[string]any{
		"name":           info.Name,
		"vendor_version": info.VendorVersion,
		"capabilities":   len(caps.Capabilities),
	}
	node, err := csi.NewNodeClient(conn).NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
	if err == nil {
		out["node_id"] = node.NodeId
		out["topology"] = node.AccessibleTopology.GetSegments()
	} else {
		out["node_error"] = err.Error()
	}
	emit(out)
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: %s register|csi -socket PATH [-dial path|unix]", os.Args[0])
	}
	flags := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	socket := flags.String("socket", "", "unix socket path")
	dial := flags.String("dial", "path", "path (like kubelet) or unix (unix:// target)")
	_ = flags.Parse(os.Args[2:])
	if *socket == "" {
		fail("-socket is required")
	}
	switch os.Args[1] {
	case "register":
		register(*socket)
	case "csi":
		csiCalls(*socket, *dial)
	default:
		fail("unknown command %q", os.Args[1])
	}
}
