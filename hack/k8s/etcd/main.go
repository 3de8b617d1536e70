// Command etcd is the etcd server, built from go.etcd.io/etcd/server/v3 for the
// RelayRL local control plane (hack/k8s/build.sh). It is upstream's etcd main
// without the etcdutl/etcdctl subcommands.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
